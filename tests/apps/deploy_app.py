"""For tests/deploy.rs: reports who the process runs as now and who it ran as when the app was imported
(with --uid/--gid the import must already run unprivileged)."""

import os

LOADED_AS = os.getuid()


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [f"uid={os.getuid()} gid={os.getgid()} loaded_as={LOADED_AS}".encode()]
