#!/usr/bin/env bash
# Idempotent set-up shared by scripts/test.sh and scripts/example.sh: nginx (apt), the Python packages the
# tests and the example use (pip), and the release build of oxwsgi. Safe to run again; it only installs
# what is missing. Works without a terminal (CI=true).
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

# The packages `oxwsgi` and its tests need from apt; only the missing ones are installed, and the package
# index is refreshed only when something must be installed.
apt_missing=()
have_nginx || apt_missing+=(nginx-light)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || die "missing ${apt_missing[*]} and no apt-get to install it"
    step "apt-get install ${apt_missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null
    have_nginx || die "nginx is still missing after installing ${apt_missing[*]}"
else
    step "nginx present"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (oxwsgi embeds the python3 on PATH)"
step "pip install -r tests/requirements.txt ($(python3 -c 'import sys; print(sys.executable)'))"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -r tests/requirements.txt

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
step "cargo build --release --locked"
cargo build --release --locked --quiet
[ -x target/release/oxwsgi ] || die "target/release/oxwsgi was not built"
step "built target/release/oxwsgi"
