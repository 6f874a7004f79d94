"""An app file whose import fails: oxwsgi must print the traceback and one error line, then exit 1."""

import oxwsgi_test_module_that_does_not_exist  # noqa: F401


def application(environ, start_response):
    start_response("200 OK", [])
    return [b"unreachable"]
