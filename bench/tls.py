#!/usr/bin/env python3
"""What uwsgi over TLS (`--ssl-socket`, nginx's `uwsgi_pass suwsgi://` with client certificates) costs per
request, as a ratio to plain uwsgi over TCP. nginx opens one upstream connection per uwsgi request, so
every request pays a TLS handshake: a full one, or an abbreviated one when nginx resumes a session it kept
(`uwsgi_ssl_session_reuse on`, nginx's default). Three configurations of the same oxwsgi (one worker
process with one Python thread, a master) on `tests/apps/hello.py`, behind the same nginx, side by side in
the same run:

  plain uwsgi     `--socket 127.0.0.1:PORT`, nginx `uwsgi_pass 127.0.0.1:PORT`;
  TLS reuse on    `--ssl-socket 127.0.0.1:PORT,CERT,KEY,CA` (client certificates required), nginx
                  `uwsgi_pass suwsgi://...` with its certificate, `uwsgi_ssl_verify on` and
                  `uwsgi_ssl_session_reuse on`;
  TLS reuse off   the same with `uwsgi_ssl_session_reuse off`: a full handshake for every request.

wrk keeps its connections to nginx open; nginx connects upstream per request. Reported per configuration:
requests/s, oxwsgi's CPU time per request (every process of its tree, from /proc), nginx's, p99 latency,
and each as a ratio to plain uwsgi. Before the rounds, a short *session check* per TLS configuration counts
the handshakes nginx made and how many of them resumed a session (from nginx's debug log of its upstream
connections, which costs too much to keep on while measuring).

The certificates (a CA, the server's for app.oxwsgi.test and 127.0.0.1, nginx's client certificate; P-256
keys) are made with openssl for each run of this script, by tests/e2e/certs.py, and removed with the
temporary directory. Runs go in rounds (every configuration in turn, each on fresh processes); a run is
invalid on a non-2xx answer, a socket error, or a server process that died or was replaced. Exit status:
0 when every run and check was valid, 1 when one was not, 2 when the benchmark could not run, 130 when
interrupted. bench/README.md ("TLS") gives the method.

Run:  bash bench/run.sh --tls [--quick]   (installs what is missing, then runs this script)
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lib.load import LoadResult, run_wrk
from lib import windows
from lib.procs import BenchError, Child, command_output, free_port, run_entry_point, wait_listening
from lib.report import Cell, describe, every_run_section, invalid_details, number, ratio, with_spread
from lib.results import CPU_US, LATENCY_P99, NGINX_US, REQUESTS_PER_SECOND, Metric, RunResult
from lib.scenarios import HELLO, HELLO_BODY, KIND_WRK, ONE_BY_ONE, WRK_CONNECTIONS, Scenario, Settings, measure
from lib.servers import (
    LISTEN_BACKLOG,
    ServerConfig,
    Serving,
    Stack,
    common_flags,
    http_get,
    server_env,
    start_nginx,
)
from lib.tools import (
    REPO,
    SETUP_HINT,
    Tools,
    check_flags,
    environment,
    find_tools,
    load_average,
    require_executable,
)

RESULTS = REPO / "bench" / "results" / "tls-latest.md"
# No Rust example runs here; the main benchmark's helpers that find binaries and name versions take their
# directory all the same.
EXAMPLES_DIR = REPO / "target" / "release" / "examples"
# The tests' certificate helper (openssl calls only): one place that knows how the project's test
# certificates are made, so the benchmark's handshakes are the ones the TLS tests exercise.
CERTS_MODULE = REPO / "tests" / "e2e" / "certs.py"

# oxwsgi listens here in every configuration: TCP on loopback, so that plain uwsgi and uwsgi over TLS
# differ by TLS alone (the main benchmark's Unix socket would add the difference between the two kinds of
# socket to the ratio).
HOST = "127.0.0.1"
CALLABLE = "application"
# The main benchmark's hello through nginx keeps 32 requests in flight: plain uwsgi here is that scenario
# over TCP. With TLS 1.3 it also matters for resumption: each ticket resumes one connection only, and
# concurrent connections started from the same saved session compete for it (see bench/README.md).
CONNECTIONS = WRK_CONNECTIONS
# The session check's load: long enough for thousands of handshakes even without reuse (about 1,000/s
# here), short because nginx's debug log grows by about 3.5 KiB per request.
CHECK_SECONDS = 1
# nginx's log of its upstream handshakes during the session check. `debug_event` keeps only the event
# module's debug lines (the handshakes among them), not the HTTP module's many per request; it needs an
# nginx built --with-debug (Debian's are).
HANDSHAKE_LOG = "handshakes.log"
# Lines nginx writes (at debug level, event module) after each handshake of a connection it made, and
# when that handshake resumed a session: SSL_session_reused() was true, so the server accepted it.
HANDSHAKE_LINE = re.compile(r"\bSSL: (TLSv[\d.]+), cipher: ")
RESUMED_LINE = "SSL reused session"
# The protocols `--ssl-protocols` may name: those rustls speaks (nginx would also offer older ones).
TLS_PROTOCOLS = ("TLSv1.2", "TLSv1.3")
# The certificates' names in the run's directory (tests/e2e/certs.py writes NAME.crt and NAME.key).
CA, SERVER_CERT, NGINX_CERT = "ca", "server", "nginx"

PLAIN = ServerConfig("plain uwsgi", "plain")
TLS_REUSE = ServerConfig("TLS reuse on", "tls-reuse")
TLS_FULL = ServerConfig("TLS reuse off", "tls-full")
CONFIGS = (PLAIN, TLS_REUSE, TLS_FULL)
TLS_CONFIGS = (TLS_REUSE, TLS_FULL)
# What nginx → oxwsgi is in each configuration, for the report.
HOPS = {
    PLAIN: "`uwsgi_pass 127.0.0.1:PORT`",
    TLS_REUSE: "`suwsgi://`, client certificate, `uwsgi_ssl_session_reuse on`",
    TLS_FULL: "`suwsgi://`, client certificate, `uwsgi_ssl_session_reuse off`",
}
# The options oxwsgi must have for the command lines below to mean what bench/README.md says.
REQUIRED_FLAGS = (
    "--socket",
    "--ssl-socket",
    "--master",
    "--processes",
    "--threads",
    "--disable-logging",
    "--listen",
    "--wsgi-file",
    "--callable",
)

METRICS = (REQUESTS_PER_SECOND, CPU_US, NGINX_US, LATENCY_P99)
HELLO_TLS = Scenario(
    "hello",
    f"`tests/apps/hello.py`, `GET /` (14-byte body), 1×1, wrk -t1 -c{CONNECTIONS} through nginx",
    Serving(HELLO, ONE_BY_ONE, True, "/", HELLO_BODY),
    KIND_WRK,
    "/",
    CONFIGS,
    METRICS,
    connections=CONNECTIONS,
)


@dataclass(frozen=True)
class Tls:
    """The TLS side of a run: where the certificates are, the protocols nginx may offer (None: nginx's
    default), and the DNS name the server's certificate carries (nginx's `uwsgi_ssl_name`)."""

    certs: Path
    protocols: str | None
    server_name: str

    def file(self, name: str, kind: str) -> Path:
        return self.certs / f"{name}.{kind}"


# --- certificates ---------------------------------------------------------------------------------------


def make_certificates(certs: Path) -> str:
    """A CA, the server's certificate (DNS app.oxwsgi.test and IP 127.0.0.1) and nginx's client certificate,
    all signed by the CA, with P-256 keys; returns the server's DNS name."""
    spec = importlib.util.spec_from_file_location("e2e_certs", CERTS_MODULE)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot load {CERTS_MODULE}")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    certs.mkdir()
    try:
        helper.make_ca(certs, CA)
        helper.make_cert(certs, SERVER_CERT, CA, ip=HOST)
        helper.make_cert(certs, NGINX_CERT, CA)
    except OSError as err:
        raise BenchError(f"openssl failed: {err}") from None
    except subprocess.CalledProcessError as err:
        raise BenchError(f"openssl failed: {' '.join(err.cmd)}\n{err.stderr.decode(errors='replace')}") from None
    return str(helper.SERVER_NAME)


# --- the stack ------------------------------------------------------------------------------------------


def server_argv(tools: Tools, tls: Tls, config: ServerConfig, serving: Serving, port: int | str) -> list[str]:
    """oxwsgi with the main benchmark's options (a master, `serving.shape`, no request log, the same
    backlog), listening in the clear or over TLS with client certificates required."""
    address = f"{HOST}:{port}"
    if config == PLAIN:
        listen = ["--socket", address]
    else:
        files = [tls.file(SERVER_CERT, "crt"), tls.file(SERVER_CERT, "key"), tls.file(CA, "crt")]
        listen = ["--ssl-socket", ",".join([address, *map(str, files)])]
    app = ["--wsgi-file", str(serving.app), "--callable", CALLABLE]
    return [str(tools.oxwsgi), *listen, "--listen", str(LISTEN_BACKLOG), *common_flags(serving.shape), *app]


def upstream(tls: Tls, config: ServerConfig, port: int, nginx_prefix: Path, handshake_log: bool) -> tuple[str, str]:
    """nginx's `uwsgi_pass` target and the directives after it: none in the clear; over TLS those of
    tests/e2e/test_tls.py (nginx's client certificate, the server's verified against the CA and the name),
    session reuse on or off, and with `handshake_log` a debug log of the event module beside the warnings."""
    if config == PLAIN:
        return f"{HOST}:{port}", ""
    directives = [
        f"uwsgi_ssl_certificate {tls.file(NGINX_CERT, 'crt')}",
        f"uwsgi_ssl_certificate_key {tls.file(NGINX_CERT, 'key')}",
        f"uwsgi_ssl_trusted_certificate {tls.file(CA, 'crt')}",
        "uwsgi_ssl_verify on",
        f"uwsgi_ssl_name {tls.server_name}",
        f"uwsgi_ssl_session_reuse {'on' if config == TLS_REUSE else 'off'}",
    ]
    if tls.protocols:
        directives.append(f"uwsgi_ssl_protocols {tls.protocols}")
    if handshake_log:
        # A location's error_log replaces the one it inherits: the warnings keep their file.
        directives += [
            f"error_log {nginx_prefix / 'error.log'} warn",
            f"error_log {nginx_prefix / HANDSHAKE_LOG} debug_event",
        ]
    # On one line: the template names its placeholders in a comment too, where a line break would let
    # the rest escape the comment.
    return f"suwsgi://{HOST}:{port}", " ".join(f"{d};" for d in directives)


@contextmanager
def tls_stack(
    tools: Tools,
    config: ServerConfig,
    serving: Serving,
    run_dir: Path,
    env: dict[str, str],
    *,
    tls: Tls,
    handshake_log: bool = False,
) -> Iterator[Stack]:
    """oxwsgi on a free port and nginx in front of it, yielded once one request through both answered 200
    with the expected body; both stopped (nginx first) on the way out."""
    run_dir.mkdir()
    port = free_port()
    server = Child(config.name, server_argv(tools, tls, config, serving, port), run_dir / "server.log", env=env)
    nginx: Child | None = None
    try:
        # A connection closed without a byte: oxwsgi's TLS listener takes it for a port probe, not a
        # failed handshake.
        wait_listening(server, socket.AF_INET, (HOST, port))
        prefix = run_dir / "nginx"
        target, options = upstream(tls, config, port, prefix, handshake_log)
        nginx, http_port = start_nginx(tools.nginx, prefix, target, upstream_options=options)
        base_url = f"http://{HOST}:{http_port}"
        where = f"{base_url}{serving.ready_path} through nginx"
        try:
            status, body = http_get(f"{base_url}{serving.ready_path}")
        except OSError as err:
            raise server.failure(f"did not answer the readiness check {where}: {err}") from None
        if status != 200 or serving.ready_expect not in body:
            nginx_log = (prefix / "error.log").read_text(errors="replace")[-2000:]
            raise server.failure(
                f"answered {status} {body[:200]!r} to the readiness check {where}\n--- nginx error.log ---\n{nginx_log}"
            )
        yield Stack(server, nginx, None, base_url)
    finally:
        if nginx is not None:
            nginx.stop(signal.SIGTERM)
        server.stop(signal.SIGINT)


# --- the session check ----------------------------------------------------------------------------------


@dataclass
class SessionCheck:
    """One TLS configuration's handshakes during the check, as nginx logged them."""

    config: ServerConfig
    load: LoadResult | None = None
    handshakes: int = 0
    resumed: int = 0
    protocols: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.load is not None and not self.problems

    def line(self) -> str:
        head = f"session check {self.config.name:<13}"
        if self.load is None:
            return f"{head} no measurement\n!!! INVALID CHECK: " + "; ".join(self.problems)
        share = f"{self.resumed / self.handshakes:.1%}" if self.handshakes else "—"
        protocols = ", ".join(f"{p} {n:,}" for p, n in sorted(self.protocols.items())) or "none logged"
        text = (
            f"{head} {self.load.requests:,} requests in {self.load.seconds:.1f} s · {self.handshakes:,} "
            f"handshakes ({protocols}) · {self.resumed:,} resumed ({share})"
        )
        if self.problems:
            text += "\n!!! INVALID CHECK: " + "; ".join(self.problems)
        return text


def session_check(tools: Tools, tls: Tls, settings: Settings, config: ServerConfig, run_dir: Path) -> SessionCheck:
    """CHECK_SECONDS of the benchmark's load with nginx's debug log of its upstream handshakes on, then
    the count of handshakes and of resumed ones. Every count includes the readiness request's handshake
    (a full one: nothing to resume yet)."""
    check = SessionCheck(config)
    with tls_stack(tools, config, HELLO_TLS.serving, run_dir, settings.env, tls=tls, handshake_log=True) as s:
        assert s.base_url is not None
        try:
            check.load = run_wrk(tools, s.base_url + HELLO_TLS.path, CONNECTIONS, CHECK_SECONDS, run_dir / "wrk.out")
            check.problems += check.load.problems()
        except BenchError as err:
            check.problems.append(str(err).splitlines()[0])
        if not s.server.alive():
            check.problems.append(f"the server exited with status {s.server.popen.returncode}")
    log = run_dir / "nginx" / HANDSHAKE_LOG
    if not log.exists():
        check.problems.append(f"nginx wrote no {log.name}")
        return check
    with open(log, errors="replace") as lines:
        for line in lines:
            if match := HANDSHAKE_LINE.search(line):
                check.handshakes += 1
                check.protocols[match[1]] = check.protocols.get(match[1], 0) + 1
            elif RESUMED_LINE in line:
                check.resumed += 1
    if check.load is not None and check.load.requests and not check.handshakes:
        check.problems.append(f"nginx logged no handshake in {log.name}: is it built --with-debug (`nginx -V`)?")
    return check


# --- the report -----------------------------------------------------------------------------------------


def cells(runs: list[RunResult]) -> dict[ServerConfig, Cell]:
    return {c: Cell(c, [r for r in runs if r.config == c]) for c in CONFIGS}


def main_table(runs: list[RunResult]) -> list[str]:
    """Per configuration: the median (± half the range) of each metric and its ratio to plain uwsgi's."""
    by_config = cells(runs)
    base = by_config[PLAIN]
    columns = " | ".join(f"{m.title} | ÷ plain" for m in METRICS)
    lines = [
        f"| Configuration | nginx → oxwsgi | {columns} | valid runs |",
        "|---|---|" + "--:|--:|" * len(METRICS) + "--:|",
    ]
    for config, cell in by_config.items():
        row = [config.name, HOPS[config]]
        for metric in METRICS:
            row += [with_spread(cell.values(metric), metric.digits), ratio(cell.median(metric), base.median(metric))]
        lines.append("| " + " | ".join(row + [f"{len(cell.valid)}/{len(cell.runs)}"]) + " |")
    return lines


def added_table(runs: list[RunResult]) -> list[str]:
    """What TLS adds per request, in µs of CPU: each TLS configuration's median less plain uwsgi's."""
    by_config = cells(runs)

    def added(config: ServerConfig, metric: Metric) -> float | None:
        value, base = by_config[config].median(metric), by_config[PLAIN].median(metric)
        return None if value is None or base is None else value - base

    lines = [
        "| Configuration | oxwsgi CPU µs/req added | nginx CPU µs/req added | both |",
        "|---|--:|--:|--:|",
    ]
    for config in TLS_CONFIGS:
        server, nginx = added(config, CPU_US), added(config, NGINX_US)
        both = None if server is None or nginx is None else server + nginx
        lines.append(f"| {config.name} | {number(server, 1)} | {number(nginx, 1)} | {number(both, 1)} |")
    return lines


def check_table(checks: list[SessionCheck]) -> list[str]:
    lines = [
        f"| Configuration | protocol | requests ({CHECK_SECONDS} s) | handshakes | resumed | resumed share |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for check in checks:
        if check.load is None:
            lines.append(f"| {check.config.name} | — | invalid | | | |")
            continue
        share = f"{check.resumed / check.handshakes:.1%}" if check.handshakes else "—"
        protocols = ", ".join(sorted(check.protocols)) or "—"
        mark = "" if check.valid else " (invalid)"
        lines.append(
            f"| {check.config.name}{mark} | {protocols} | {check.load.requests:,} | {check.handshakes:,} "
            f"| {check.resumed:,} | {share} |"
        )
    return lines


def render(
    env: list[tuple[str, str]],
    commands: list[str],
    args: argparse.Namespace,
    runs: list[RunResult],
    checks: list[SessionCheck],
) -> str:
    protocols = f"`uwsgi_ssl_protocols {args.ssl_protocols}`" if args.ssl_protocols else "nginx's default protocols"
    lines = ["## The cost of uwsgi over TLS (`--ssl-socket`), as a ratio to plain uwsgi", ""]
    lines += [f"- {key}: {value}" for key, value in env]
    lines += [
        f"- Method: {args.rounds} round(s); in each, every configuration in turn, each run on fresh processes: "
        f"oxwsgi (1×1, a master) and nginx, one checked request, {args.warmup} s of warm-up, {args.duration} s "
        f"measured with wrk -t1 -c{CONNECTIONS} to nginx (kept connections), nginx connecting to oxwsgi per "
        f"request over TCP on loopback; TLS with client certificates (P-256) and {protocols}. CPU/req = "
        "utime + stime of oxwsgi's whole process tree (nginx's beside it) over the window ÷ requests "
        "completed. Medians over valid runs, ± half their range; ÷ plain = the configuration's median ÷ "
        "plain uwsgi's (↑: higher is better, ↓: lower is better). See bench/README.md.",
        "- Commands (PORT and the certificate files filled in per run):",
        "",
        *(f"  - `{command}`" for command in commands),
        "",
        f"### {HELLO_TLS.name}: {HELLO_TLS.title}",
        "",
        *main_table(runs),
        "",
        "What TLS adds per request (the configuration's median CPU µs/req less plain uwsgi's):",
        "",
        *added_table(runs),
        "",
        "### Session resumption",
        "",
        f"Before the rounds, {CHECK_SECONDS} s of the same load per TLS configuration with nginx's debug log of "
        "its event module on (too costly to keep on while measuring): each handshake nginx completed with "
        "oxwsgi (`SSL: PROTOCOL, cipher: ...`), and each that resumed a session (`SSL reused session`: the "
        "server accepted the session nginx offered). Counts include the readiness request's full handshake.",
        "",
        *check_table(checks),
        "",
    ]
    lines += every_run_section(runs, "oxwsgi, nginx, wrk, other processes and the hypervisor's steal")
    return "\n".join(lines)


def command_templates(tools: Tools) -> list[str]:
    """oxwsgi's command line per configuration, with placeholders, for the report."""
    tls = Tls(Path("CERTS"), None, "")
    serving = Serving(Path("tests/apps/hello.py"), ONE_BY_ONE, True, "/", b"")
    commands = []
    for config in (PLAIN, TLS_REUSE):
        argv = server_argv(tools, tls, config, serving, "PORT")
        argv[0] = Path(argv[0]).name
        commands.append(" ".join(argv))
    return commands


def versions(tools: Tools, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The main benchmark's environment less uWSGI (not run here), plus both ends' TLS libraries."""
    env = [(k, v) for k, v in environment(tools, args.oxwsgi, EXAMPLES_DIR) if k != "uWSGI"]
    at = next(i for i, (k, _) in enumerate(env) if k == "nginx") + 1
    env[at:at] = [("TLS", tls_libraries(tools))]
    return env


def tls_libraries(tools: Tools) -> str:
    """rustls and its crypto provider as Cargo.lock has them (oxwsgi's side), and nginx's OpenSSL."""
    packages = tomllib.loads((REPO / "Cargo.lock").read_text()).get("package", [])
    locked = {p["name"]: p["version"] for p in packages if p["name"] in ("rustls", "ring")}
    rust = ", ".join(f"{name} {locked[name]}" for name in ("rustls", "ring") if name in locked) or "rustls (unknown)"
    built = next((line for line in command_output([str(tools.nginx), "-V"]).splitlines() if "OpenSSL" in line), "")
    return f"oxwsgi: {rust} (Cargo.lock); nginx: {built.strip() or 'OpenSSL version unknown'}"


# --- the run --------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    windows.add_arguments(parser, "configurations", " (--rounds and --duration still win)")
    parser.add_argument(
        "--ssl-protocols",
        help="nginx's uwsgi_ssl_protocols for the TLS hop, e.g. TLSv1.3 (default: not set, nginx's default; "
        f"of {' '.join(TLS_PROTOCOLS)})",
    )
    args = parser.parse_args(argv)
    windows.resolve(parser, args)
    if args.ssl_protocols is not None:
        names = args.ssl_protocols.split()
        if not names or any(n not in TLS_PROTOCOLS for n in names):
            parser.error(f"--ssl-protocols: space-separated, of {' '.join(TLS_PROTOCOLS)}")
        args.ssl_protocols = " ".join(names)
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    return run_entry_point("tls", lambda workdir: run(args, workdir))


def run(args: argparse.Namespace, workdir: Path) -> int:
    tools = find_tools(args.oxwsgi, EXAMPLES_DIR, [], False, workdir)
    check_flags(tools.oxwsgi, REQUIRED_FLAGS, "the command lines in bench/README.md would not apply")
    require_executable(shutil.which("openssl"), "openssl", SETUP_HINT)
    tls = Tls(workdir / "certs", args.ssl_protocols, make_certificates(workdir / "certs"))
    env = versions(tools, args)
    print("\n".join(f"{key}: {value}" for key, value in env), flush=True)
    settings = Settings(args.duration, args.warmup, server_env(workdir / "file"))

    checks = []
    for i, config in enumerate(TLS_CONFIGS):
        check = session_check(tools, tls, settings, config, workdir / f"check-{i}")
        print(check.line(), flush=True)
        if not check.valid:
            print(invalid_details(workdir / f"check-{i}"), flush=True)
        checks.append(check)

    start = functools.partial(tls_stack, tls=tls)
    runs = []
    # A B C, A B C: the machine's drift falls on every configuration alike.
    for round_no in range(1, args.rounds + 1):
        for j, config in enumerate(CONFIGS):
            run_dir = workdir / f"run-{round_no}-{j}"
            result = measure(tools, settings, HELLO_TLS, config, round_no, run_dir, start)
            print(describe(result), flush=True)
            if not result.valid:
                print(invalid_details(run_dir), flush=True)
            runs.append(result)
    env.insert(3, ("Load average at end", load_average()))
    report = render(env, command_templates(tools), args, runs, checks)
    invalid = any(not r.valid for r in runs) or any(not c.valid for c in checks)
    return windows.publish(report, RESULTS, "runs or session checks" if invalid else None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
