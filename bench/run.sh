#!/usr/bin/env bash
# The benchmark's entry point: installs what is missing (wrk, nginx, strace and openssl from apt, pyuwsgi,
# Flask, gunicorn and Granian from PyPI, the release build of oxwsgi only if there is none), builds the Rust
# examples the benchmark drives (uwsgi_load and floor; with --designs the two design prototypes too: cargo
# rebuilds only what is stale), then runs bench/bench.py with the arguments given (--quick, --rounds N,
# --duration SECS, --scenarios a,b, --oxwsgi PATH, --examples-dir DIR, --designs). Safe to run again. See
# bench/README.md. With --http-socket as the first argument it runs bench/http_socket.py instead, with the
# arguments that follow (--quick, --rounds N, --duration SECS, --apps a,b, --servers a,b, --oxwsgi PATH):
# oxwsgi's HTTP socket beside uWSGI, gunicorn and Granian. With --tls as the first argument it runs
# bench/tls.py (--quick, --rounds N, --duration SECS, --ssl-protocols P, --oxwsgi PATH): what uwsgi over
# TLS costs per request beside plain uwsgi. Neither needs a Rust example, so none is built for them.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

script_name=bench
. scripts/lib.sh

# Only the missing packages are installed, and the package index is refreshed only then.
apt_missing=()
command -v wrk >/dev/null 2>&1 || apt_missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_missing+=(nginx-light)
command -v strace >/dev/null 2>&1 || apt_missing+=(strace)
# bench/tls.py makes its certificates with openssl, for each run.
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    apt_install "${apt_missing[@]}"
else
    step "wrk, nginx, strace and openssl present"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (oxwsgi embeds the python3 on PATH)"
step "pip install -r bench/requirements.txt ($(python3 -c 'import sys; print(sys.executable)'))"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -r bench/requirements.txt

# The benchmark measures the oxwsgi build that is there; it builds one only when there is none at all.
if [ -z "${OXWSGI_BIN:-}" ] && [ ! -x target/release/oxwsgi ]; then
    step "no target/release/oxwsgi: bash scripts/setup.sh"
    bash scripts/setup.sh
fi

if [ "${1:-}" = --http-socket ]; then
    shift
    # exec, as below: Ctrl-C and SIGTERM reach the script, which stops every server it started.
    exec python3 -u bench/http_socket.py "$@"
fi
if [ "${1:-}" = --tls ]; then
    shift
    exec python3 -u bench/tls.py "$@"
fi

# The examples are the benchmark's own tools: built here, into target/ (where bench.py looks, whatever
# CARGO_TARGET_DIR says), unless --examples-dir points at others.
examples=(--example uwsgi_load --example floor)
own_examples=true
for arg in "$@"; do
    case "$arg" in
        --designs) examples+=(--example design_runtime_per_thread --example design_accept_on_python_thread) ;;
        --examples-dir | --examples-dir=*) own_examples=false ;;
    esac
done
if [ "$own_examples" = true ]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
    step "cargo build --release --locked ${examples[*]}"
    CARGO_TARGET_DIR="$PWD/target" cargo build --release --locked --quiet "${examples[@]}"
else
    step "--examples-dir given: not building the examples"
fi

# exec: Ctrl-C and SIGTERM reach bench.py itself, which stops every server and nginx it started.
exec python3 -u bench/bench.py "$@"
