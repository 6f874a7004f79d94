"""For tests/e2e/test_pip_install.py: a Flask app served by the `oxwsgi` a virtualenv got from pip, saying
which interpreter and which packages it runs with, and which worker process answered; `/sleep?seconds=N`
keeps a request in flight (for --harakiri). Its atexit handler runs Python code, so a signal the
interpreter would have turned into KeyboardInterrupt shows up in the log."""

import atexit
import os
import sys
import time

import flask

app = flask.Flask(__name__)


@atexit.register
def say_goodbye():
    print(f"venv_flask_app: atexit in pid {os.getpid()}", flush=True)


@app.get("/")
def index():
    return "flask ok\n", {"Content-Type": "text/plain; charset=utf-8"}


@app.get("/interpreter")
def interpreter():
    return flask.jsonify(
        prefix=sys.prefix,
        base_prefix=sys.base_prefix,
        executable=sys.executable,
        flask_file=flask.__file__,
        pid=os.getpid(),
        worker=os.environ.get("OXWSGI_WORKER_ID"),
        oxwsgi_environ=sorted(key for key in os.environ if key.startswith("OXWSGI_")),
    )


@app.get("/sleep")
def sleep():
    time.sleep(flask.request.args.get("seconds", 1.0, type=float))
    return "slept\n"


application = app
