#!/usr/bin/env bash
# The benchmark's entry point: installs what is missing (wrk and nginx from apt, pyuwsgi and Flask from
# PyPI, the release build only if there is none), then runs bench/bench.py with the arguments given
# (--rounds N, --duration SECS, --oxwsgi PATH). Safe to run again. See bench/README.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

script_name=bench
. scripts/lib.sh

# Only the missing packages are installed, and the package index is refreshed only then.
apt_missing=()
command -v wrk >/dev/null 2>&1 || apt_missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || apt_missing+=(nginx-light)
if [ "${#apt_missing[@]}" -gt 0 ]; then
    apt_install "${apt_missing[@]}"
else
    step "wrk and nginx present"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (oxwsgi embeds the python3 on PATH)"
step "pip install -r bench/requirements.txt ($(python3 -c 'import sys; print(sys.executable)'))"
PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --disable-pip-version-check -r bench/requirements.txt

# The benchmark measures the build that is there; it builds only when there is none at all.
if [ -z "${OXWSGI_BIN:-}" ] && [ ! -x target/release/oxwsgi ]; then
    step "no target/release/oxwsgi: bash scripts/setup.sh"
    bash scripts/setup.sh
fi

# exec: Ctrl-C and SIGTERM reach bench.py itself, which stops every server and nginx it started.
exec python3 -u bench/bench.py "$@"
