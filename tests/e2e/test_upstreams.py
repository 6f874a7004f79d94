"""nginx/upstreams.conf, the shipped multi-backend config, with three real oxwsgi backends behind real
nginx: one is killed (SIGKILL) under load, and every request is still answered by the other two."""

import signal
from collections import Counter

import requests

from conftest import APPS, HTTP_TIMEOUT, REPO, Process, find_nginx, free_port
from test_deploy_config import main_config
from test_workers import Load

UPSTREAMS_CONF = REPO / "nginx" / "upstreams.conf"
SHIPPED_BACKENDS = ("127.0.0.1:3031", "127.0.0.1:3032", "127.0.0.1:3033")


def render(prefix, port, backends):
    server = UPSTREAMS_CONF.read_text()
    for shipped, actual in zip(SHIPPED_BACKENDS, backends, strict=True):
        assert f"server {shipped} " in server, f"nginx/upstreams.conf no longer lists {shipped}"
        server = server.replace(f"server {shipped} ", f"server {actual} ")
    server = server.replace("listen 80;", f"listen 127.0.0.1:{port};")
    return main_config(prefix, server)


def test_traffic_continues_when_one_of_three_backends_dies(launcher, tmp_path):
    nginx_bin = find_nginx()
    backends = []
    for i in range(3):
        workdir = tmp_path / f"backend{i}"
        workdir.mkdir()
        app = ["--wsgi-file", str(APPS / "workers_app.py")]
        backends.append(launcher.start_oxwsgi(app, workdir, upstream="tcp"))
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = free_port()
    conf = render(prefix, port, [b.upstream for b in backends])
    nginx = Process("nginx", [nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                    prefix / "nginx.out")
    front = backends[0]
    front.nginx, front.http_port = nginx, port
    try:
        nginx.start()
        nginx.wait_listening(("127.0.0.1", port))
        url = front.url("/sleep?ms=5")
        with Load(url, per_thread=150) as load:
            load.wait_sent(200)
            victim = backends[1]
            victim.oxwsgi.popen.send_signal(signal.SIGKILL)
            victim.oxwsgi.popen.wait(timeout=HTTP_TIMEOUT)
        assert load.errors == [], load.errors[:5]
        assert load.statuses == Counter({200: len(load.threads) * 150}), (load.statuses, front.report())
        # After the kill, the two survivors answer everything.
        served_after = Counter()
        for _ in range(30):
            response = requests.get(front.url("/"), timeout=HTTP_TIMEOUT)
            served_after[response.status_code] += 1
        assert served_after == Counter({200: 30})
        for survivor in (backends[0], backends[2]):
            assert "=> 200" in survivor.oxwsgi_log()
    finally:
        nginx.stop()
        for backend in backends:
            backend.stop()
