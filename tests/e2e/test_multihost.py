"""nginx/tls-upstreams.conf, the shipped config for backends on other machines, with three "hosts" on this
one (the loopback addresses 127.0.0.2-4, each a master with two workers speaking uwsgi over TLS with client
certificates) behind one real nginx. Under load, one host is stopped and another reloaded: no request
fails (the stopped host finishes what it accepted, nginx sends the rest to the others), and once the host
is back nginx gives it traffic again."""

import os
import signal
import time
from collections import Counter

from certs import SERVER_NAME, make_ca, make_cert, require_openssl
from conftest import APPS, HTTP_TIMEOUT, READY_INTERVAL, READY_TRIES, REPO, Process, find_nginx, free_port
from test_deploy_config import main_config
from test_workers import LOAD_THREADS, Load

import pytest
import requests

TLS_UPSTREAMS_CONF = REPO / "nginx" / "tls-upstreams.conf"
SHIPPED_BACKENDS = ("10.0.0.11:3031", "10.0.0.12:3031", "10.0.0.13:3031")
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# Requests each load thread may send at most: far more than the test needs, so the load never runs out
# before the test stops it.
PER_THREAD = 100_000


def render(prefix, port, backends, certs):
    server = TLS_UPSTREAMS_CONF.read_text()
    for shipped, actual in zip(SHIPPED_BACKENDS, backends, strict=True):
        assert f"server {shipped} " in server, f"nginx/tls-upstreams.conf no longer lists {shipped}"
        server = server.replace(f"server {shipped} ", f"server {actual} ")
    for shipped, actual in (
        ("listen 80;", f"listen 127.0.0.1:{port};"),
        ("/etc/nginx/oxwsgi/", f"{certs}/"),
        ("uwsgi_ssl_name backends.internal;", f"uwsgi_ssl_name {SERVER_NAME};"),
    ):
        assert shipped in server, f"nginx/tls-upstreams.conf no longer has {shipped!r}"
        server = server.replace(shipped, actual)
    return main_config(prefix, server)


class Host:
    """One simulated machine: an oxwsgi master on its own loopback address."""

    def __init__(self, oxwsgi_bin, address, port, certs, workdir):
        self.address, self.workdir, self.starts = address, workdir, 0
        ssl_socket = f"{address}:{port},{certs}/backend.crt,{certs}/backend.key,{certs}/nginx-ca.crt"
        self.argv = [str(oxwsgi_bin), "--ssl-socket", ssl_socket, "--wsgi-file", str(APPS / "workers_app.py"),
                     "--processes", "2", "--threads", "2"]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        env.pop("OXWSGI_LOG", None)
        self.env, self.process, self.processes = env, None, []

    def start(self):
        self.starts += 1
        self.process = Process(f"oxwsgi@{self.address}", self.argv, self.workdir / f"oxwsgi-{self.starts}.log",
                               env=self.env)
        self.processes.append(self.process)
        self.process.start()
        self.process.wait_listening((self.address, int(self.argv[2].split(",")[0].rsplit(":", 1)[1])))

    def served(self):
        return self.process.log().count("=> 200")


def wait_until(condition, what, hosts):
    for _ in range(READY_TRIES * 2):
        if condition():
            return
        time.sleep(READY_INTERVAL)
    logs = "\n".join(f"--- {h.address} ---\n{h.process.log()[-3000:]}" for h in hosts)
    pytest.fail(f"never happened: {what}\n{logs}", pytrace=False)


def test_three_tls_hosts_lose_nothing_when_one_stops_and_one_reloads(oxwsgi_bin, tmp_path):
    require_openssl()
    nginx_bin = find_nginx()
    certs = tmp_path / "certs"
    certs.mkdir()
    make_ca(certs, "backends-ca")
    make_ca(certs, "nginx-ca")
    make_cert(certs, "backend", "backends-ca", ip="127.0.0.2")
    make_cert(certs, "nginx", "nginx-ca")
    port = free_port()
    hosts = []
    for address in HOSTS:
        workdir = tmp_path / address
        workdir.mkdir()
        hosts.append(Host(oxwsgi_bin, address, port, certs, workdir))
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    http_port = free_port()
    conf = render(prefix, http_port, [f"{h.address}:{port}" for h in hosts], certs)
    nginx = Process("nginx", [nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                    prefix / "nginx.out")
    try:
        for host in hosts:
            host.start()
        nginx.start()
        nginx.wait_listening(("127.0.0.1", http_port))
        stopped, reloaded, steady = hosts
        with Load(f"http://127.0.0.1:{http_port}/sleep?ms=5", per_thread=PER_THREAD) as load:
            load.wait_sent(300)
            wait_until(lambda: all(h.served() > 0 for h in hosts), "every host served", hosts)
            # One host goes away (a graceful stop: it finishes what it accepted), another reloads.
            stopped.process.popen.send_signal(signal.SIGTERM)
            reloaded.process.popen.send_signal(signal.SIGHUP)
            assert stopped.process.popen.wait(timeout=60) == 0
            wait_until(lambda: reloaded.process.log().count("retired") >= 2, "both old workers retired", hosts)
            before = steady.served() + reloaded.served()
            load.wait_sent(load.sent() + 300)
            assert steady.served() + reloaded.served() > before, "the other hosts took the traffic"
            load.stopping.set()
        assert load.errors == [], load.errors[:5]
        assert set(load.statuses) == {200}, (load.statuses, (prefix / "error.log").read_text()[-3000:])
        # nginx retries a GET elsewhere when a host fails it, so the clients' view alone could hide a request
        # the stopped host dropped: nginx's own log may show connections refused or reset before the request
        # was sent (the host going away), never a request cut off after it was sent.
        before_the_request = ("Connection refused", "SSL handshake", "while connecting to upstream")
        cut_off = [
            line for line in (prefix / "error.log").read_text().splitlines()
            if "upstream" in line and not any(mark in line for mark in before_the_request)
        ]
        assert cut_off == [], cut_off[:5]
        # The host comes back: once its fail_timeout is over, nginx gives it requests again.
        stopped.start()
        after = Counter()

        def came_back():
            after[requests.get(f"http://127.0.0.1:{http_port}/", timeout=HTTP_TIMEOUT).status_code] += 1
            return stopped.served() > 0

        wait_until(came_back, "nginx sends traffic to the host that came back", hosts)
        assert set(after) == {200}, after
        assert "TLS handshake" not in "".join(p.log() for h in hosts for p in h.processes)
    finally:
        nginx.stop()
        for host in hosts:
            if host.process is not None:
                host.process.stop()
