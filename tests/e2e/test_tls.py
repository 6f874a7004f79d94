"""uwsgi over TLS with client certificates (`--ssl-socket`), behind real nginx speaking `suwsgi://` with
`uwsgi_ssl_certificate` and `uwsgi_ssl_verify on`. The certificates are made here with openssl, for this run
only (a CA, the server's, nginx's client certificate, and a client certificate from another CA). A peer
without a certificate, one from the wrong CA, and plain uwsgi sent to the TLS port are each refused at the
handshake and logged, while nginx's requests go on being served; a SIGHUP reload picks up a renewed
certificate."""

import os
import signal
import socket
import ssl
import subprocess
import time

import pytest
import requests

from certs import SERVER_NAME, make_ca, make_cert, require_openssl
from conftest import APPS, HTTP_TIMEOUT, READY_INTERVAL, READY_TRIES, Process, find_nginx, free_port

NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{http_port};
        location / {{
            include /etc/nginx/uwsgi_params;
            uwsgi_pass suwsgi://127.0.0.1:{tls_port};
            uwsgi_ssl_certificate {certs}/nginx.crt;
            uwsgi_ssl_certificate_key {certs}/nginx.key;
            uwsgi_ssl_trusted_certificate {certs}/ca.crt;
            uwsgi_ssl_verify on;
            uwsgi_ssl_name {server_name};
            uwsgi_ssl_session_reuse on;
        }}
    }}
}}
"""


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory, oxwsgi_bin):
    require_openssl()
    nginx_bin = find_nginx()
    work = tmp_path_factory.mktemp("tls")
    certs = work / "certs"
    certs.mkdir()
    make_ca(certs, "ca")
    make_ca(certs, "other-ca")
    make_cert(certs, "server", "ca", ip="127.0.0.1", serial=1)
    make_cert(certs, "nginx", "ca")
    make_cert(certs, "stranger", "other-ca")
    tls_port = free_port()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("OXWSGI_LOG", None)
    oxwsgi = Process(
        "oxwsgi",
        [
            str(oxwsgi_bin),
            "--ssl-socket",
            f"127.0.0.1:{tls_port},{certs}/server.crt,{certs}/server.key,{certs}/ca.crt",
            "--wsgi-file",
            str(APPS / "pep3333_app.py"),
            "--processes",
            "1",
            "--master",
        ],
        work / "oxwsgi.log",
        env=env,
    )
    oxwsgi.start()
    nginx = None
    try:
        oxwsgi.wait_listening(("127.0.0.1", tls_port))
        prefix = work / "nginx"
        prefix.mkdir()
        http_port = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, http_port=http_port, tls_port=tls_port, certs=certs,
                                      server_name=SERVER_NAME))
        nginx = Process("nginx", [nginx_bin, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
                        prefix / "nginx.out")
        nginx.start()
        nginx.wait_listening(("127.0.0.1", http_port))
        yield {"oxwsgi": oxwsgi, "url": f"http://127.0.0.1:{http_port}", "tls_port": tls_port, "certs": certs,
               "nginx_error_log": prefix / "error.log"}
    finally:
        if nginx is not None:
            nginx.stop()
        oxwsgi.stop()


def client_context(certs, cert=None):
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    if cert:
        context.load_cert_chain(str(certs / f"{cert}.crt"), str(certs / f"{cert}.key"))
    return context


def handshake(stack, cert=None):
    """A direct TLS client (not nginx): returns the server certificate's serial, or raises."""
    with socket.create_connection(("127.0.0.1", stack["tls_port"]), timeout=10) as raw:
        with client_context(stack["certs"], cert).wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            # TLS 1.3 sends the verdict on the client certificate after the handshake: a read shows it.
            tls.sendall(b"\x64\x00\x00\x00")  # a uwsgi ping
            answer = tls.recv(4)
            if answer != b"\x64\x00\x00\x01":
                raise ConnectionError(f"no pong: {answer!r}")
            return tls.getpeercert()["serialNumber"]


def wait_log(stack, needle, count=1):
    for _ in range(READY_TRIES):
        if stack["oxwsgi"].log().count(needle) >= count:
            return
        time.sleep(READY_INTERVAL)
    pytest.fail(f"{needle!r} not logged {count} time(s):\n{stack['oxwsgi'].log()}", pytrace=False)


def test_nginx_speaks_uwsgi_over_tls_with_its_client_certificate(tls_stack):
    for _ in range(3):
        answer = requests.get(tls_stack["url"] + "/environ?x=1", timeout=HTTP_TIMEOUT)
        assert answer.status_code == 200, tls_stack["nginx_error_log"].read_text()
        assert "QUERY_STRING: 'x=1'" in answer.text
        # The scheme is what nginx says (plain HTTP here), not the TLS of the hop behind it.
        assert "wsgi.url_scheme: 'http'" in answer.text
    body = os.urandom(200_000)
    echoed = requests.post(tls_stack["url"] + "/echo", data=body, timeout=HTTP_TIMEOUT)
    assert echoed.content == body
    assert "(uwsgi over TLS)" in tls_stack["oxwsgi"].log()


def test_peers_without_the_right_certificate_are_refused_and_logged(tls_stack):
    assert handshake(tls_stack, "nginx")  # the right certificate passes (a pong)
    for cert in (None, "stranger"):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            handshake(tls_stack, cert)
    wait_log(tls_stack, "TLS handshake failed", count=2)
    # Plain uwsgi to the TLS port: not a TLS record, refused at once.
    with socket.create_connection(("127.0.0.1", tls_stack["tls_port"]), timeout=10) as plain:
        plain.sendall(b"\x00\x0e\x00\x00\x0e\x00REQUEST_METHOD\x03\x00GET")
        plain.settimeout(10)
        try:
            assert plain.recv(100)[:1] != b"H", "never an HTTP answer in the clear"
        except ConnectionResetError:
            pass
    wait_log(tls_stack, "TLS handshake failed", count=3)
    log = tls_stack["oxwsgi"].log()
    assert "refused a connection: TLS handshake failed" in log, log
    # nginx's requests are still served.
    assert requests.get(tls_stack["url"] + "/environ", timeout=HTTP_TIMEOUT).status_code == 200


def test_oxwsgi_ping_speaks_tls_with_a_client_certificate(tls_stack, oxwsgi_bin):
    certs, addr = tls_stack["certs"], f"127.0.0.1:{tls_stack['tls_port']}"
    tls = ["--tls-ca", str(certs / "ca.crt")]
    client = ["--tls-cert", str(certs / "nginx.crt"), "--tls-key", str(certs / "nginx.key")]
    for extra in ([], ["--tls-name", SERVER_NAME]):
        done = subprocess.run([str(oxwsgi_bin), "ping", addr, *tls, *client, *extra], capture_output=True, text=True)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    refused = subprocess.run([str(oxwsgi_bin), "ping", addr, *tls, "--timeout", "5"], capture_output=True, text=True)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith(f"oxwsgi ping {addr}: "), refused.stderr
    plain = subprocess.run([str(oxwsgi_bin), "ping", addr, "--timeout", "2"], capture_output=True, text=True)
    assert plain.returncode == 1 and "the socket speaks TLS" in plain.stderr, plain.stderr


def test_a_reload_picks_up_a_renewed_certificate(tls_stack):
    certs = tls_stack["certs"]
    assert handshake(tls_stack, "nginx") == "01"
    make_cert(certs, "server", "ca", ip="127.0.0.1", serial=2)
    tls_stack["oxwsgi"].popen.send_signal(signal.SIGHUP)
    for _ in range(READY_TRIES):
        try:
            if handshake(tls_stack, "nginx") == "02":
                break
        except (ssl.SSLError, ConnectionError, OSError):
            pass
        time.sleep(READY_INTERVAL)
    else:
        pytest.fail("the renewed certificate was never presented", pytrace=False)
    assert requests.get(tls_stack["url"] + "/environ", timeout=HTTP_TIMEOUT).status_code == 200
