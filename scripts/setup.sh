#!/usr/bin/env bash
# Idempotent set-up shared by scripts/test.sh and scripts/example.sh: nginx and Prometheus (apt), the Python
# packages the tests and the example use (pip), and the release build of oxwsgi. Safe to run again; it only
# installs what is missing. Works without a terminal (CI=true).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

script_name=setup
. scripts/lib.sh

have_nginx() {
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]
}

# tests/e2e/test_prometheus.py scrapes oxwsgi with a Prometheus of its own and lints /metrics with promtool.
have_prometheus() {
    { command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; } &&
        { command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ]; }
}

# The packages `oxwsgi` and its tests need from apt; only the missing ones are installed, and the package
# index is refreshed only when something must be installed.
apt_missing=()
have_nginx || apt_missing+=(nginx-light)
have_prometheus || apt_missing+=(prometheus)
# tests/e2e/test_http_socket.py speaks to --http-socket with curl, as a user would.
command -v curl >/dev/null 2>&1 || apt_missing+=(curl)
# tests/e2e/test_tls.py makes its certificates with openssl.
command -v openssl >/dev/null 2>&1 || apt_missing+=(openssl)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    prometheus_was_running=false
    pgrep -x prometheus >/dev/null 2>&1 && prometheus_was_running=true
    apt_install "${apt_missing[@]}"
    have_nginx || die "nginx is still missing after installing ${apt_missing[*]}"
    have_prometheus || die "prometheus or promtool is still missing after installing ${apt_missing[*]}"
    command -v curl >/dev/null 2>&1 || die "curl is still missing after installing ${apt_missing[*]}"
    command -v openssl >/dev/null 2>&1 || die "openssl is still missing after installing ${apt_missing[*]}"
    if [ "$prometheus_was_running" = false ] && pgrep -x prometheus >/dev/null 2>&1; then
        die "installing ${apt_missing[*]} started a Prometheus daemon (pid $(pgrep -x prometheus | xargs));" \
            "stop it (systemctl disable --now prometheus, or kill that pid) and run this again"
    fi
else
    step "nginx and prometheus present"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (oxwsgi embeds the python3 on PATH)"
step "pip install -r tests/requirements.txt ($(python3 -c 'import sys; print(sys.executable)'))"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt

# tests/e2e/test_pip_install.py builds the wheel (pip fetches maturin from PyPI for the build) and installs
# it into a fresh virtualenv: python3 needs its venv and ensurepip modules, which Debian packages apart.
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install "python$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || die "python3 still cannot make a virtualenv"
fi
step "python3 can make a virtualenv"

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
step "cargo build --release --locked"
cargo build --release --locked --quiet
[ -x target/release/oxwsgi ] || die "target/release/oxwsgi was not built"
step "built target/release/oxwsgi"
