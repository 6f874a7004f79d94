"""flask_app's app wrapped in wsgiref.validate, made strict: every validator complaint becomes an error the
tests can see.

- A failed validator check raises AssertionError inside the request: the server logs a traceback and
  answers 500.
- WSGIWarning (e.g. a missing QUERY_STRING) is turned into an exception, with the same effect.
- The check that close() was called runs in the result wrapper's __del__, where an AssertionError is
  "unraisable": Python would only print "Exception ignored in ...". The hook below prints it with an
  `UNRAISABLE:` marker that the tests look for in the server log.
- That __del__ check only runs if the server lets go of the result. GET /_validator/stats (answered
  outside the validator) reports how many results were returned and how many were released, so the
  tests can check that none is kept alive.
"""

import gc
import json
import sys
import threading
import traceback
import warnings
import weakref
from wsgiref.validate import WSGIWarning, validator

from flask_app import app  # the --wsgi-file's directory is on sys.path

warnings.simplefilter("error", WSGIWarning)


def _report_unraisable(unraisable):
    detail = "".join(
        traceback.format_exception(
            unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback
        )
    )
    print(
        f"UNRAISABLE: {unraisable.err_msg or 'Exception ignored in'}: {unraisable.object!r}\n{detail}",
        file=sys.stderr,
        flush=True,
    )


sys.unraisablehook = _report_unraisable

_validated_app = validator(app)
_stats_lock = threading.Lock()
_stats = {"returned": 0, "released": 0}
STATS_PATH = "/_validator/stats"


def _count_release():
    # A weakref callback runs after the object's __del__, i.e. after the validator's close() check.
    with _stats_lock:
        _stats["released"] += 1


def application(environ, start_response):
    if environ.get("PATH_INFO") == STATS_PATH:
        gc.collect()  # results caught in reference cycles are released only by the cycle collector
        with _stats_lock:
            body = json.dumps(_stats).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]
    result = _validated_app(environ, start_response)
    with _stats_lock:
        _stats["returned"] += 1
    weakref.finalize(result, _count_release)
    return result
