#!/usr/bin/env bash
# Idempotent set-up for the fuzz targets (scripts/fuzz.sh): checks for the nightly toolchain, which
# cargo-fuzz's libFuzzer instrumentation needs, and installs cargo-fuzz from crates.io when it is missing.
# Kept apart from setup.sh so that the example and the other tests never need nightly. A missing nightly is
# an error, never a skip: the fuzz step must not pass without fuzzing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

script_name=setup-fuzz
. scripts/lib.sh

command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
nightly=$(cargo +nightly --version 2>/dev/null) ||
    die "the nightly toolchain is missing (cargo +nightly fails); install it with: rustup toolchain install nightly"
step "nightly present: $nightly"

if cargo fuzz --version >/dev/null 2>&1; then
    step "cargo-fuzz present: $(cargo fuzz --version)"
else
    step "cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
    cargo fuzz --version >/dev/null 2>&1 || die "cargo-fuzz is still missing after installing it"
fi
