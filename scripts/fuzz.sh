#!/usr/bin/env bash
# The fuzz step of the test suite (scripts/test.sh): every cargo-fuzz target in proto/fuzz runs for a bounded
# time, starting from its committed seeds (proto/fuzz/seeds/<target>/, copied to a temporary corpus so the
# repository stays as it was), and the step fails if any target crashes, panics or hangs. Every target runs
# even when an earlier one failed, so one run reports them all.
#
#   FUZZ_SECONDS   how long each target runs (default 30)
#
# A crashing input is kept in proto/fuzz/artifacts/<target>/ (git-ignored) and printed with the command that
# replays it. Needs nightly and cargo-fuzz (scripts/setup-fuzz.sh, run first, checks and installs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

script_name=fuzz
. scripts/lib.sh

seconds=${FUZZ_SECONDS:-30}
[[ $seconds =~ ^[1-9][0-9]*$ ]] || die "FUZZ_SECONDS must be a whole number of seconds above 0, not '$seconds'"

bash scripts/setup-fuzz.sh

# proto has no unsafe code, so AddressSanitizer would only slow the targets down (several times over);
# debug assertions are on, so an arithmetic overflow panics instead of wrapping unseen.
build_flags=(--sanitizer none --debug-assertions)

# Inputs may reach a whole packet (a 65535-byte block and its header) where the target reads packets; the
# others' inputs are a status and headers or a body in pieces, for which libFuzzer's 4 KiB default is ample.
max_len() {
    case $1 in
        parse_packet | parse_split | environ) echo 70000 ;;
        *) echo 4096 ;;
    esac
}

cd proto/fuzz
mapfile -t targets < <(cargo +nightly fuzz list)
[ "${#targets[@]}" -gt 0 ] || die "cargo fuzz list found no targets in proto/fuzz"
for target in "${targets[@]}"; do
    [ -d "seeds/$target" ] || die "no seeds for $target: proto/fuzz/seeds/$target (see proto/tests/fuzz_seeds.rs)"
done

step "cargo +nightly fuzz build ${build_flags[*]}"
cargo +nightly fuzz build "${build_flags[@]}"

corpora=$(mktemp -d "${TMPDIR:-/tmp}/oxwsgi-fuzz.XXXXXX")
trap 'rm -rf "$corpora"' EXIT

failed=()
for target in "${targets[@]}"; do
    corpus="$corpora/$target"
    mkdir -p "$corpus"
    cp "seeds/$target"/* "$corpus/"
    step "$target: ${seconds}s from $(ls "$corpus" | wc -l) seeds"
    # libFuzzer's line per new input and its dictionary are left out; the summary, and a crash's panic and
    # stack, are not.
    if cargo +nightly fuzz run "${build_flags[@]}" "$target" "$corpus" -- \
        -max_total_time="$seconds" -max_len="$(max_len "$target")" -timeout=10 -print_final_stats=1 2>&1 |
        { grep -v -E '^(#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)|"|###### )' || true; }; then
        step "$target: clean"
    else
        failed+=("$target")
        printf '%s: %s FAILED; replay with: cd proto/fuzz && cargo +nightly fuzz run %s %s artifacts/%s/<file>\n' \
            "$script_name" "$target" "${build_flags[*]}" "$target" "$target" >&2
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    die "crashes in: ${failed[*]}"
fi
step "all ${#targets[@]} targets clean for ${seconds}s each: ${targets[*]}"
