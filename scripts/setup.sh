#!/usr/bin/env bash
# Idempotent set-up shared by scripts/test.sh and scripts/example.sh: nginx and Prometheus (apt), the Python
# packages the tests and the example use (pip), and the release build of oxwsgi. Safe to run again; it only
# installs what is missing. Works without a terminal (CI=true).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '==> %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Root runs apt-get directly; anyone else goes through sudo (non-interactive: fail rather than prompt).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root or sudo to run: $*"
    fi
}

have_nginx() {
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]
}

# tests/e2e/test_prometheus.py scrapes oxwsgi with a Prometheus of its own and lints /metrics with promtool.
have_prometheus() {
    { command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]; } &&
        { command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ]; }
}

# The packages' maintainer scripts start their daemons (Debian's prometheus listens on :9090, nginx on :80);
# the tests and the example run their own on free ports, so the install starts no service: a policy-rc.d that
# refuses every start (exit 101), only when the machine has none (Docker images ship one), removed again on
# exit. invoke-rc.d and deb-systemd-invoke both honour it.
POLICY_RC_D=/usr/sbin/policy-rc.d
policy_rc_d_ours=false
remove_policy_rc_d() {
    if [ "$policy_rc_d_ours" = true ]; then
        as_root rm -f "$POLICY_RC_D"
        policy_rc_d_ours=false
    fi
}
trap remove_policy_rc_d EXIT

# The packages `oxwsgi` and its tests need from apt; only the missing ones are installed, and the package
# index is refreshed only when something must be installed.
apt_missing=()
have_nginx || apt_missing+=(nginx-light)
have_prometheus || apt_missing+=(prometheus)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${apt_missing[*]} and no apt-get to install it"
    step "apt-get install ${apt_missing[*]}"
    prometheus_was_running=false
    pgrep -x prometheus >/dev/null 2>&1 && prometheus_was_running=true
    if [ ! -e "$POLICY_RC_D" ]; then
        policy_rc_d_ours=true
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY_RC_D" >/dev/null
        as_root chmod 755 "$POLICY_RC_D"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    remove_policy_rc_d
    have_nginx || die "nginx is still missing after installing ${apt_missing[*]}"
    have_prometheus || die "prometheus or promtool is still missing after installing ${apt_missing[*]}"
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

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
step "cargo build --release --locked"
cargo build --release --locked --quiet
[ -x target/release/oxwsgi ] || die "target/release/oxwsgi was not built"
step "built target/release/oxwsgi"
