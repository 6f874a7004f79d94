"""oxwsgi: a WSGI server for Python applications behind nginx, speaking the uwsgi protocol.

Installed with pip, the `oxwsgi` command (and `python -m oxwsgi`) runs the server with this interpreter,
so the app is imported with the packages of the environment oxwsgi is installed in. The server itself is
the compiled module `oxwsgi._oxwsgi`; see `oxwsgi --help` for its options.
"""

from oxwsgi._oxwsgi import run

__all__ = ["run"]
