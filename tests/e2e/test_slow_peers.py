"""Overload and slow peers, with real nginx in front: what a busy server and a peer that is silent, slow or
stops reading may cost, and what they must not.

Every stack here runs one Python thread, so a peer that held it would starve every good request: the
good requests are the probe. The slow peers talk straight to the uwsgi socket (nginx would shield oxwsgi
from most of them), the good requests go through nginx. Nothing asserts a duration: waits are bounded
polls, and "while the peer was still trickling" is an ordering (a flag the trickling thread clears when
it stops), not a time.
"""

import http.client
import resource
import select
import socket
import struct
import threading
import time
import warnings
from collections import Counter

import pytest

from conftest import APPS, READY_INTERVAL, READY_TRIES

APP = ["--wsgi-file", str(APPS / "slow_peers_app.py")]
# --socket-timeout of the stack the slow peers meet: short, so a test waits for it a few times at most.
SOCKET_TIMEOUT = 2
# nginx's uwsgi_read_timeout in nginx/test.conf.template.
NGINX_READ_TIMEOUT = 60
# A good request that has not been answered after this long is stuck behind something. Far above what a
# request takes on a loaded machine, and below nginx's timeouts, so it is our verdict, not nginx's 504.
GOOD_TIMEOUT = 10 * SOCKET_TIMEOUT
# Bytes a trickling peer sends, one a second: the trickle outlasts the socket timeout, so a thread that
# waited on it would be seen waiting longer than the timeout.
TRICKLE_BYTES = 3 * SOCKET_TIMEOUT
TRICKLE_INTERVAL = 1.0
# How many good requests must be answered while a peer is still trickling. With one thread they are
# answered one at a time in a few milliseconds each; a thread held by the trickle answers none of them.
ANSWERED_WHILE_TRICKLING = 3


# --- clients ---------------------------------------------------------------------------------------


def uwsgi_packet(vars_: dict[str, str]) -> bytes:
    """A uwsgi request packet (modifier1 0): the 4-byte header, then each var as two length-prefixed
    strings (little-endian u16 lengths), as nginx's uwsgi_pass sends it."""
    block = b"".join(
        struct.pack("<H", len(k)) + k + struct.pack("<H", len(v)) + v
        for k, v in ((k.encode(), v.encode()) for k, v in vars_.items())
    )
    return struct.pack("<BHB", 0, len(block), 0) + block


def request_vars(method: str, path: str, content_length: int = 0) -> dict[str, str]:
    """The vars nginx would send for `method path` (those the app and the server read)."""
    return {
        "REQUEST_METHOD": method,
        "REQUEST_URI": path,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "CONTENT_LENGTH": str(content_length) if content_length else "",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "REMOTE_ADDR": "127.0.0.1",
    }


def connect_uwsgi(stack) -> socket.socket:
    """A connection straight to oxwsgi's uwsgi socket, past nginx. A Unix socket whose listen queue is
    full refuses at once (EAGAIN) rather than waiting: retried, bounded."""
    peer = socket.socket(socket.AF_UNIX)
    peer.settimeout(GOOD_TIMEOUT)
    for _ in range(READY_TRIES):
        try:
            peer.connect(str(stack.socket_path))
            return peer
        except BlockingIOError:
            time.sleep(READY_INTERVAL)
    peer.close()
    pytest.fail(f"the listen queue stayed full for {READY_TRIES} tries\n{stack.report()}")


def good_request(stack, path: str = "/") -> int:
    """One GET through nginx on a fresh connection; its status. Fails the test if it is not answered
    within GOOD_TIMEOUT."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.http_port, timeout=GOOD_TIMEOUT)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except TimeoutError:
        pytest.fail(f"a good request for {path} was not answered within {GOOD_TIMEOUT} s\n{stack.report()}")
    finally:
        conn.close()


def wait_for(condition, what: str, stack, tries: int = READY_TRIES) -> None:
    for _ in range(tries):
        if condition():
            return
        time.sleep(READY_INTERVAL)
    pytest.fail(f"never happened: {what}\n{stack.report()}")


def is_open(peer: socket.socket) -> bool:
    """The server has neither closed nor answered this connection: nothing to read, no EOF, no error."""
    poller = select.poll()
    poller.register(peer, select.POLLIN)
    return poller.poll(0) == []


def wait_closed_by_server(peer: socket.socket, bound: float) -> bytes:
    """Reads until the server closes the connection (what it sent, possibly nothing); fails if it is still
    open after `bound` seconds of silence. A reset counts as closed."""
    peer.settimeout(bound)
    received = b""
    while True:
        try:
            data = peer.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server did not close the connection within {bound} s (got {received[:200]!r})")
        except ConnectionResetError:
            return received
        if not data:
            return received
        received += data


class Trickle(threading.Thread):
    """Sends `data` to `peer` one byte every TRICKLE_INTERVAL, then leaves the connection open and silent.
    `running` is set until the last byte's interval has passed. If the server closes the connection early,
    the trickle keeps its schedule without sending, so "while trickling" spans the same bytes' worth of
    intervals either way."""

    def __init__(self, peer: socket.socket, data: bytes):
        super().__init__(daemon=True)
        self.peer, self.data = peer, data
        self.running = threading.Event()
        self.running.set()
        self.error: OSError | None = None

    def run(self):
        try:
            for i in range(len(self.data)):
                if self.error is None:
                    try:
                        self.peer.sendall(self.data[i : i + 1])
                    except OSError as err:
                        self.error = err
                time.sleep(TRICKLE_INTERVAL)
        finally:
            self.running.clear()


def good_requests_while(trickle: Trickle, stack) -> int:
    """Sends good requests through nginx, one after the other, until the trickle ends; each must be
    answered 200. Returns how many were answered while the trickle was still going on."""
    answered_while_trickling = 0
    while trickle.running.is_set():
        assert good_request(stack) == 200, stack.report()
        if trickle.running.is_set():
            answered_while_trickling += 1
        time.sleep(0.05)  # a breath between requests: the machine's cores are shared
    return answered_while_trickling


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1])


# --- overload --------------------------------------------------------------------------------------

# 200 clients against one thread of a 10 ms app: at most ~100 requests a second get served, so up to 200
# connections wait in the listen queue. With a backlog of 64 it overflows, and nginx must be refused at
# once: a Unix socket with a full queue fails connect() with EAGAIN, which nginx answers with 502 (a 504
# would mean a wait until nginx's timeout). With the default backlog (1024) they all fit, and all must be
# answered.
OVERLOAD_CLIENTS = 200
OVERLOAD_REQUESTS_EACH = 5
SMALL_BACKLOG = 64
# Above nginx's own uwsgi_read_timeout: a request stuck in oxwsgi gets nginx's 504 first, which the test
# reports as such; a client timeout means nginx itself hung.
OVERLOAD_CLIENT_TIMEOUT = NGINX_READ_TIMEOUT + 15
# Growth of the worker's resident memory over the overload, after a warm-up that touched every buffer a
# request uses. A serving thread reuses one read buffer (128 KiB); a connection refused by the kernel
# costs oxwsgi nothing. Per-request leftovers — a read buffer, a 64 KiB body buffer or an environ kept for
# each of the up to 1,000 requests — would add 60-130 MiB; 32 MiB leaves room for the allocator keeping
# freed pages and the I/O runtime's threads growing their buffers once.
OVERLOAD_RSS_GROWTH_KIB = 32 * 1024
WARM_UP_REQUESTS = 50


class Overload:
    """OVERLOAD_CLIENTS threads, released together, each sending OVERLOAD_REQUESTS_EACH GETs to `path`
    through nginx on one keep-alive connection."""

    def __init__(self, stack, path: str):
        self.stack, self.path = stack, path
        self.statuses: Counter = Counter()
        self.hangs = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.start = threading.Barrier(OVERLOAD_CLIENTS)

    def client(self):
        self.start.wait()
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.http_port, timeout=OVERLOAD_CLIENT_TIMEOUT)
        try:
            for _ in range(OVERLOAD_REQUESTS_EACH):
                try:
                    conn.request("GET", self.path)
                    response = conn.getresponse()
                    response.read()
                    with self.lock:
                        self.statuses[response.status] += 1
                except TimeoutError:
                    with self.lock:
                        self.hangs += 1
                    conn.close()
                except (OSError, http.client.HTTPException) as err:
                    with self.lock:
                        self.errors.append(repr(err))
                    conn.close()
        finally:
            conn.close()

    def run(self):
        clients = [threading.Thread(target=self.client) for _ in range(OVERLOAD_CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()


@pytest.mark.parametrize("backlog", [SMALL_BACKLOG, None], ids=["backlog-64", "default-backlog"])
def test_overload_is_answered_or_refused_at_once_and_the_worker_recovers(launcher, backlog):
    listen = ["--listen", str(backlog)] if backlog else []
    stack = launcher.start(APP, extra_args=["--threads", "1", *listen])
    try:
        # Single-process mode: the process we started is the one that serves.
        pid = stack.oxwsgi.popen.pid
        for _ in range(WARM_UP_REQUESTS):
            assert good_request(stack, "/sleep?ms=10") == 200, stack.report()
        rss_before = vm_rss_kib(pid)

        load = Overload(stack, "/sleep?ms=10")
        load.run()
        statuses = load.statuses

        assert load.hangs == 0, f"{load.hangs} requests hung past nginx's timeout\n{stack.report()}"
        assert load.errors == [], load.errors[:5]
        assert sum(statuses.values()) == OVERLOAD_CLIENTS * OVERLOAD_REQUESTS_EACH
        error_log = (stack.nginx.log_path.parent / "error.log").read_text()
        if backlog:
            assert set(statuses) == {200, 502}, (
                f"expected answers and, once the queue of {backlog} overflowed, refusals: {statuses}\n"
                f"{stack.report()}"
            )
            # Every 502 was a refused connect, answered at once; none a connection oxwsgi accepted and
            # then dropped, reset or kept waiting.
            refused = error_log.count("(11: Resource temporarily unavailable) while connecting to upstream")
            assert refused == statuses[502], (refused, statuses, error_log[-3000:])
        else:
            assert statuses == Counter({200: OVERLOAD_CLIENTS * OVERLOAD_REQUESTS_EACH}), (
                statuses,
                stack.report(),
            )
        for failure in ("prematurely closed", "reset by peer", "timed out"):
            assert failure not in error_log, error_log[-3000:]
        # Everything nginx got a 200 for, oxwsgi logged as served: nothing answered twice or lost. (A line
        # is written once its response is out, so the last ones may still be coming.)
        expected = statuses[200] + WARM_UP_REQUESTS

        def served():
            return stack.oxwsgi_log().count("GET /sleep?ms=10 => 200")

        wait_for(lambda: served() >= expected, f"{expected} requests logged as served", stack)
        assert served() == expected, (served(), statuses)

        growth = vm_rss_kib(pid) - rss_before
        assert growth < OVERLOAD_RSS_GROWTH_KIB, f"the worker grew by {growth} KiB (from {rss_before} KiB)"
        # Right after the load: serving as usual.
        after = Counter(good_request(stack, "/sleep?ms=10") for _ in range(20))
        assert after == Counter({200: 20}), (after, stack.report())
    finally:
        stack.stop()


# --- idle connections ------------------------------------------------------------------------------

IDLE_CONNECTIONS = 1500
# Descriptors this process needs besides the idle connections (pytest, the good requests, the logs).
FD_HEADROOM = 200


def test_good_requests_are_answered_while_1500_connections_sit_idle(launcher):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # oxwsgi inherits the raised limit, and holds one descriptor per idle connection too. With a hard
    # limit below what 1,500 need, the test opens what fits, and warns.
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    idle_count = IDLE_CONNECTIONS
    if hard != resource.RLIM_INFINITY and hard < IDLE_CONNECTIONS + FD_HEADROOM:
        idle_count = hard - FD_HEADROOM
        warnings.warn(f"RLIMIT_NOFILE's hard limit is {hard}: {idle_count} idle connections, not 1,500")
    # A socket timeout far beyond the test: the server must keep the idle connections, not drop them.
    stack = launcher.start(APP, extra_args=["--threads", "1", "--socket-timeout", "120"])
    idle = []
    try:
        for _ in range(idle_count):
            idle.append(connect_uwsgi(stack))
        statuses = Counter(good_request(stack) for _ in range(20))
        assert statuses == Counter({200: 20}), (idle_count, statuses, stack.report())
        # The server still holds every idle connection, waiting for its request...
        closed = sum(1 for peer in idle if not is_open(peer))
        assert closed == 0, f"{closed} of {idle_count} idle connections were closed\n{stack.report()}"
        # ...and serves one as soon as it comes: the first opened and the last.
        for peer in (idle[0], idle[-1]):
            peer.sendall(uwsgi_packet(request_vars("GET", "/")))
            reply = wait_closed_by_server(peer, GOOD_TIMEOUT)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply[:200]
    finally:
        for peer in idle:
            peer.close()
        stack.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- slow and stalled peers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict(launcher):
    """One thread, and a short socket timeout."""
    stack = launcher.start(APP, extra_args=["--threads", "1", "--socket-timeout", str(SOCKET_TIMEOUT)])
    yield stack
    stack.stop()


def test_a_trickled_packet_holds_no_thread_and_is_closed_by_the_socket_timeout(strict):
    packet = uwsgi_packet(request_vars("GET", "/"))
    timeouts_before = strict.oxwsgi_log().count("timed out waiting for the request after")
    peer = connect_uwsgi(strict)
    try:
        trickle = Trickle(peer, packet[:TRICKLE_BYTES])
        trickle.start()
        answered = good_requests_while(trickle, strict)
        trickle.join()
        assert answered >= ANSWERED_WHILE_TRICKLING, (
            f"only {answered} good requests were answered while a packet trickled in\n{strict.report()}"
        )
        # Silent now: closed without a reply by the socket timeout (bounded generously), and said so.
        assert wait_closed_by_server(peer, 10 * SOCKET_TIMEOUT) == b""
        wait_for(
            lambda: strict.oxwsgi_log().count("timed out waiting for the request after") > timeouts_before,
            "the timeout logged",
            strict,
        )
        assert good_request(strict) == 200
    finally:
        peer.close()


# A body small enough for the server to read before the app starts, and one the app reads itself.
BODY_SIZES = {"small": 1000, "large": 1024 * 1024}
# What of a large body is sent at once, so the app is inside wsgi.input.read() when the trickle starts.
LARGE_BODY_HEAD = 128 * 1024


def start_body(stack, size: int) -> tuple[socket.socket, bytes]:
    """Connects, sends the packet of a POST /read with a `size`-byte body and, for a large body, its first
    part; returns the connection and the rest of the body."""
    body = b"b" * size
    first = 0 if size <= 64 * 1024 else LARGE_BODY_HEAD
    peer = connect_uwsgi(stack)
    peer.sendall(uwsgi_packet(request_vars("POST", "/read", size)) + body[:first])
    return peer, body[first:]


@pytest.mark.parametrize("size", BODY_SIZES.values(), ids=BODY_SIZES.keys())
def test_a_stalled_request_body_gives_the_thread_back_after_the_socket_timeout(strict, size):
    peer, _rest = start_body(strict, size)
    try:
        # The body stops arriving. With one thread, the good request is answered only once nothing waits
        # on the stalled body any more: at once (small body, read by the I/O runtime), or once the socket
        # timeout ends the app's read (large body). A thread kept waiting would leave it unanswered.
        assert good_request(strict) == 200, strict.report()
        # The stalled request is given up: closed, or answered by the app after its read failed with the
        # timeout (never as if the body had come).
        reply = wait_closed_by_server(peer, 10 * SOCKET_TIMEOUT)
        assert reply == b"" or (b"read failed" in reply and b"timed out" in reply), reply[:300]
        statuses = Counter(good_request(strict) for _ in range(5))
        assert statuses == Counter({200: 5}), statuses
    finally:
        peer.close()


@pytest.mark.parametrize("size", BODY_SIZES.values(), ids=BODY_SIZES.keys())
def test_a_trickled_request_body_holds_the_thread_no_longer_than_the_socket_timeout(strict, size):
    # The small body is read by the I/O runtime before the app starts; the app itself reads the large one
    # from the socket (it is inside wsgi.input.read() when the trickle starts).
    served_before = strict.oxwsgi_log().count("POST /read =>")
    peer, rest = start_body(strict, size)
    try:
        trickle = Trickle(peer, rest[:TRICKLE_BYTES])
        trickle.start()
        answered = good_requests_while(trickle, strict)
        trickle.join()
        reply = wait_closed_by_server(peer, 10 * SOCKET_TIMEOUT)
        if size > 64 * 1024:
            # Read by the app from the socket: its read failed for lack of progress, and says so.
            assert b"came too slowly" in reply, reply[:300]
        wait_for(lambda: strict.oxwsgi_log().count("POST /read =>") > served_before, "the POST's log", strict)
        post = [line for line in strict.oxwsgi_log().splitlines() if "POST /read =>" in line][-1]
        # The trickle lasted TRICKLE_BYTES seconds, several socket timeouts: a thread waiting on it all
        # along answers nothing meanwhile.
        assert answered >= ANSWERED_WHILE_TRICKLING, (
            f"only {answered} good requests were answered while a {size}-byte body trickled in, one byte a "
            f"second, for {TRICKLE_BYTES} s against a socket timeout of {SOCKET_TIMEOUT} s; the trickled "
            f"request: {post}\n{strict.report()}"
        )
        assert good_request(strict) == 200
    finally:
        peer.close()


# More than every buffer between the app and a client that stopped reading can take (oxwsgi's socket,
# nginx's 8 KiB, the loopback connection's few MiB), so the app's writes must block.
STREAM_CHUNKS = 64


def test_a_client_that_stops_reading_an_unbuffered_stream_frees_the_thread(strict):
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(GOOD_TIMEOUT)
    client.connect(("127.0.0.1", strict.http_port))
    try:
        client.sendall(f"GET /stream?chunks={STREAM_CHUNKS} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        head = client.recv(4096)
        assert head.startswith(b"HTTP/1.1 200 OK"), head[:300]
        # From here on the client reads nothing and keeps the connection open. With one thread, the good
        # request is answered only once the app's blocked write gives up, after the socket timeout; nginx
        # would close the client only after its own send_timeout (60 s), past GOOD_TIMEOUT.
        assert good_request(strict) == 200, strict.report()
        write_timed_out = "client gone while writing the response: timed out writing the response"
        wait_for(
            lambda: write_timed_out in strict.oxwsgi_log(),
            "the stream's write timed out",
            strict,
        )
        statuses = Counter(good_request(strict) for _ in range(5))
        assert statuses == Counter({200: 5}), statuses
    finally:
        client.close()
