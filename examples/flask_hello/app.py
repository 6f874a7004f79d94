"""A small Flask app for scripts/example.sh: a greeting, a path parameter, a form POST and a JSON API.

Run it behind nginx with `bash scripts/example.sh`, or directly under oxwsgi:

    target/release/oxwsgi --socket /tmp/hello.sock --wsgi-file examples/flask_hello/app.py --threads 4
"""

import platform
import threading

from flask import Flask, jsonify, redirect, render_template_string, request, url_for

app = Flask(__name__)

# Guest-book entries posted through the form; shared by all threads, hence the lock.
_entries: list[str] = []
_entries_lock = threading.Lock()

PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>oxwsgi example</title></head>
<body>
  <h1>Hello from Flask on oxwsgi</h1>
  <p>Python {{ python }} &middot; served over {{ scheme }} by {{ server }} &middot;
     {{ threads }} Python threads</p>
  <ul>
    <li><a href="{{ url_for('hello', name='world') }}">/hello/world</a> &mdash; a path parameter</li>
    <li><a href="{{ url_for('api_info') }}">/api/info</a> &mdash; JSON</li>
  </ul>
  <h2>Guest book</h2>
  <form method="post" action="{{ url_for('sign') }}">
    <input name="name" placeholder="Your name" required maxlength="80">
    <button type="submit">Sign</button>
  </form>
  <ul>
  {% for entry in entries %}<li>{{ entry }}</li>{% else %}<li><em>nobody yet</em></li>{% endfor %}
  </ul>
</body>
</html>
"""


@app.get("/")
def index():
    with _entries_lock:
        entries = list(_entries)
    version = request.environ.get("oxwsgi.version")
    return render_template_string(
        PAGE,
        python=platform.python_version(),
        scheme=request.scheme,
        server=f"oxwsgi {version}" if version else "a WSGI server",
        threads="several" if request.environ.get("wsgi.multithread") else "one",
        entries=entries,
    )


@app.get("/hello/<name>")
def hello(name: str):
    # Jinja escapes `name` in templates; as plain text we return it with a text/plain type instead.
    return f"Hello, {name}!\n", {
        "Content-Type": "text/plain; charset=utf-8",
        "X-Content-Type-Options": "nosniff",
    }


@app.post("/sign")
def sign():
    name = request.form.get("name", "").strip()[:80]
    if name:
        with _entries_lock:
            _entries.append(name)
    # Post/redirect/get: reloading the page does not resubmit the form.
    return redirect(url_for("index"), code=303)


@app.get("/api/info")
def api_info():
    environ = request.environ
    return jsonify(
        server=environ.get("oxwsgi.version"),
        python=platform.python_version(),
        url_scheme=environ["wsgi.url_scheme"],
        multithread=environ["wsgi.multithread"],
        remote_addr=request.remote_addr,
        path=request.path,
        args=request.args,
    )


# `--wsgi-file` looks for `application` by default.
application = app
