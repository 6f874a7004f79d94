#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): set-up, formatting, lints, the Rust tests (protocol crate,
# unit tests, tests against the binary), a bounded run of every fuzz target (scripts/fuzz.sh; FUZZ_SECONDS
# per target, 30 by default; needs nightly) and the end-to-end tests through real nginx. Every step runs
# even when an earlier one failed, so one run reports everything; the exit status is non-zero if any failed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

failed=()
run() {
    local name=$1
    shift
    printf '\n==> %s: %s\n' "$name" "$*"
    if "$@"; then
        printf '==> %s: ok\n' "$name"
    else
        printf '==> %s: FAILED (exit %s)\n' "$name" "$?"
        failed+=("$name")
    fi
}

run fmt cargo fmt --all -- --check
run clippy cargo clippy --workspace --all-targets -- -D warnings
run rust-tests cargo test --workspace --release
# Every target from its committed seeds; a crash fails the step, and so does a missing nightly toolchain.
run fuzz bash scripts/fuzz.sh
# Run by hand, the e2e tests skip (loudly) without nginx; here setup.sh has just installed it, so a missing
# nginx or Python package is a failure (as under CI=true), never a skip counted as a pass.
run e2e env OXWSGI_E2E_STRICT=1 python3 -m pytest tests/e2e -q -p no:cacheprovider -rfEs

echo
if [ "${#failed[@]}" -gt 0 ]; then
    echo "test.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "test.sh: all passed (fmt, clippy, rust-tests, fuzz, e2e)"
