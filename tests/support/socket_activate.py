"""A minimal systemd-style socket-activation launcher for tests: binds a Unix socket at PATH, then runs
COMMAND with the listening socket at descriptor 3 and LISTEN_FDS=1, LISTEN_PID=<its own pid>, as systemd
does (LISTEN_PID can only be known in the child, after the fork). With SOCKET_ACTIVATE_NAME set, the socket
is named that in LISTEN_FDNAMES, as a unit's FileDescriptorName= names it.

Usage: python3 socket_activate.py PATH COMMAND [ARGS...]"""

import os
import socket
import sys

path, command = sys.argv[1], sys.argv[2:]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(128)
pid = os.fork()
if pid == 0:
    if listener.fileno() != 3:
        os.dup2(listener.fileno(), 3)
    os.set_inheritable(3, True)  # (dup2 onto itself would leave close-on-exec set)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    if "SOCKET_ACTIVATE_NAME" in os.environ:
        os.environ["LISTEN_FDNAMES"] = os.environ.pop("SOCKET_ACTIVATE_NAME")
    os.execv(command[0], command)
listener.close()
# Stand in for the service manager: pass our exit status on, and forward SIGTERM to the service.
import signal  # noqa: E402

signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
