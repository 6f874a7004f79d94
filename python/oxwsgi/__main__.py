"""The `oxwsgi` command of the installed package, also run as `python -m oxwsgi`."""

import os
import sys

from oxwsgi._oxwsgi import run

# What a master starts its workers with, followed by its own arguments: this interpreter by the path it
# was started as (a virtualenv's python finds the virtualenv's packages from that path) and this module.
WORKER_COMMAND = [sys.executable, "-m", "oxwsgi"]


def main() -> None:
    name = os.path.basename(sys.argv[0])
    if name == "__main__.py":
        name = "python -m oxwsgi"
    status = run([name, *sys.argv[1:]], WORKER_COMMAND)
    sys.stdout.flush()
    sys.stderr.flush()
    # As the standalone binary does, exit without finalizing the interpreter: the app's atexit handlers
    # already ran after the last request (a master never loads the app), and a Python thread still stuck
    # in a request past the grace period must not be torn down under it by finalization.
    os._exit(status)


if __name__ == "__main__":
    main()
