# Shell helpers for the project's set-up scripts (scripts/setup.sh, bench/run.sh): messages, running as
# root, and installing Debian packages without starting their daemons. Source it after setting
# `script_name`, which error messages start with.

step() { printf '==> %s\n' "$*"; }
die() { printf '%s: error: %s\n' "${script_name:-setup}" "$*" >&2; exit 1; }

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

# The packages' maintainer scripts start their daemons (Debian's prometheus listens on :9090, nginx on :80);
# the tests, the example and the benchmark run their own on free ports, so an install starts no service: a
# policy-rc.d that refuses every start (exit 101), only when the machine has none (Docker images ship one),
# removed again afterwards (or on exit, if the install fails). invoke-rc.d and deb-systemd-invoke honour it.
POLICY_RC_D=/usr/sbin/policy-rc.d
policy_rc_d_ours=false
remove_policy_rc_d() {
    if [ "$policy_rc_d_ours" = true ]; then
        as_root rm -f "$POLICY_RC_D"
        policy_rc_d_ours=false
    fi
}

# apt_install PACKAGE...: refreshes the index and installs the packages, without recommends or daemons.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "missing $* and no apt-get to install it"
    step "apt-get install $*"
    if [ ! -e "$POLICY_RC_D" ]; then
        policy_rc_d_ours=true
        trap remove_policy_rc_d EXIT
        printf '#!/bin/sh\nexit 101\n' | as_root tee "$POLICY_RC_D" >/dev/null
        as_root chmod 755 "$POLICY_RC_D"
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    remove_policy_rc_d
}
